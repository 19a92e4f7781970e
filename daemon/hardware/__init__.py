"""What this host can run on: NVIDIA GPUs (NVML), OpenCL devices, onnxruntime's providers,
the provider choice, verified session creation, and the `doctor` report.

Never imports the engine (`daemon.ocr`) or the store; the engine asks here for its sessions.
"""
