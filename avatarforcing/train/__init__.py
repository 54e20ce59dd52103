"""Training: data shards, teacher, ODE backfill + regression, DMD, and the shared training loop.

Modules (one concept each):

* :mod:`.data`      the on-disk sample format (the only reader/writer) and the streaming datasets
* :mod:`.preprocess` videos + audio + captions -> clip samples (VAE latents, audio features, text)
* :mod:`.teacher`   the bidirectional teacher: flow-matching loss, CFG, the Euler sampler and its sigma grid
* :mod:`.ode`       ODE backfill (teacher trajectories at the student's timesteps) and one-step regression
* :mod:`.dmd`       DMD: rollouts with mixed-window backprop, the DMD gradient, the critic
* :mod:`.trainer`   the shared loop: accelerate, AdamW, EMA, accumulation, clipping, logging, checkpoints
* :mod:`.memory`    analytic memory model of the 1.3B stages (used by scripts/bench_train.py)
"""
