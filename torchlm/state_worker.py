"""``python -m torchlm.state_worker read|write ...``: one rank of a train-state
conversion (:mod:`torchlm.trainstate`), started by ``parity convert`` through torchrun."""

from torchlm.trainstate import main
from torchlm.worker import serve

if __name__ == "__main__":
    serve(main)
