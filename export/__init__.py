"""Trained runs -> servable artefacts (docs/export.md).

``serving_module`` (user tensors batch 1 broadcast to B candidates, sigmoid output),
``exporter`` (ONNX via torch.export / TorchScript via trace, staged then renamed into place),
``parity`` (the gate against PyTorch eval), ``manifest`` (the torch-free contract the gateway
reads), ``triton_repo`` (config.pbtxt, local and deploy flavours), ``triton_local`` (the
nvidia-pytriton ``tritonserver`` binary), ``cli`` (``ctrserve export``, ``ctrserve triton``).
``serving_module``, ``exporter`` and ``parity`` import torch; ``manifest``, ``triton_repo`` and
``triton_local`` do not.
"""
