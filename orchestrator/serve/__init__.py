"""Serving stage: a finished run's export/ -> ONNX (fp32 and dynamic int8) with its parity, accuracy and speed
measured on the run's held-out rows (`bert-orch export RUN_DIR`, orchestrator/serve/onnx_export.py).

    tasks.py        which task a run dir holds, the exported module per task, eval rows, agreement and accuracy
    measure.py      ONNX Runtime sessions, batched runs of each backend, latency / throughput, CPU flags
    onnx_export.py  the export itself, serving.json, the table and the CLI
"""
