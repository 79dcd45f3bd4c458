"""The steps of `make gpu-check` (benchmarks/gpu_check.py is their runner), one module each:

    plan.py            targets, config files, and the sizes of every step (GPU run or CPU dry run)
    processes.py       step records, child processes with time limits, the context a Python step sees
    cuda_tests.py      pytest -m cuda (command step)
    demo.py            the demo config in fp32 and bf16, evaluateSSL.py on the device and the CPU
    bench_step.py      benchmarks/bench_step.py at paper size (and with training.compile)
    bench_components.py  benchmarks/bench_components.py on the device
    torchrun.py        2 processes under torchrun, NCCL or gloo (command step)
    eval_full_size.py  evaluation of Cityscapes-sized PNG files read from disk
    report.py          the figures against their targets, the Markdown report
"""
