"""The training engine: everything around the method that a run needs, apart from the method itself (utils/).

    run.py            Run: the run's state (networks, optimiser, memory, balancing, samplers, best mIoU) and the
                      services of its loop (learning rate, optimiser step + EMA, logging, evaluation, checkpoints)
    cli.py            the training scripts' flags; the one device a run uses
    config.py         the JSON config: schema, defaults, validation, --set overrides
    resume.py         which config a run uses and which checkpoint it continues (--resume, --recover)
    networks.py       student, its compiled forward, the SGD optimiser
    synthetic_pretrain.py  backbone.pretrained "synthetic": the backbone trained on synthetic scenes, cached on
                      first use (lock, hash-named file, rank 0 builds under torchrun)
    run_state.py      latest.pth: capture and restore of the whole run state (exact resume)
    checkpoint.py     atomic writes, weights_only loads
    plan.py           --dry-run's plan
    rng.py            seeding and RNG states; deterministic kernels or cuDNN's benchmark (utils.deterministic)
    entry.py          main_guard: the top level of every script (messages, exit codes)
    distributed.py    torchrun: process group, collectives
    ddp_step.py       steps 6-10 of an iteration as one forward, DistributedDataParallel under torchrun; the stop vote
    batchnorm.py      BatchNorm statistics averaged over processes where read; the refresh after the loop
    graceful_stop.py  SIGTERM/SIGINT and bad files: latest.pth written, then a clean stop
    fault_guard.py    NaN/Inf: stop before anything is written; --recover
    logger.py         console, train_log.jsonl, TensorBoard; curves.py draws curves.png
    log_window.py     the loss terms summed between log rows; each row's per-term means, in one fixed order
    evaluation.py     the evaluation loop (confusion matrix over the validation split); visualize.py its pictures
    inference.py      a trained checkpoint ready to predict (evaluateSSL.py, predict.py)

Imports run one way: the scripts use the engine; the engine uses the method (utils/), the data (data/) and the
networks (model/), none of which uses the engine (tests/test_layout.py).
"""
