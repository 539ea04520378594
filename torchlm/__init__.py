"""PyTorch mirror of the Llama model and a DeepSpeed ZeRO (stages 0-3) trainer.

- :mod:`torchlm.model`: ``Llama``, a plain single-device ``nn.Module`` with Hugging Face
  Llama parameter names; :mod:`torchlm.weights`: HF-named safetensors I/O.
- :mod:`torchlm.api`: in-process logits / loss and gradients / HF reference logits
  for the parity harness.
- :mod:`torchlm.ds_config`: DeepSpeed config, AdamW param groups, LR schedule.
- :mod:`torchlm.trainer` (run by :mod:`torchlm.worker` in every process) and
  :mod:`torchlm.launch`: ``torchlm train`` (:mod:`torchlm.cli`).
"""
