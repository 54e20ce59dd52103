"""Training: data shards, teacher, ODE backfill + regression, DMD, and the shared training loop.

Modules (one concept each):

* :mod:`.data`      the on-disk sample format (the only reader/writer) and the streaming datasets
* :mod:`.preprocess` videos + audio + captions -> clip samples (VAE latents, audio features, text)
* :mod:`.teacher`   the bidirectional teacher: flow-matching loss, CFG, the Euler sampler and its sigma grid
* :mod:`.ode`       ODE backfill (teacher trajectories at the student's timesteps) and one-step regression
* :mod:`.dmd`       DMD: rollouts with mixed-window backprop, the DMD gradient, the critic
* :mod:`.stage`     the Stage protocol: what the loop needs from the teacher / ODE / DMD stages
* :mod:`.loop`      the shared loop (Trainer): randomness, gradient accumulation, steps, entry points
* :mod:`.roles`     trained networks: AdamW with warm-up, clipping, EMA
* :mod:`.distributed` processes (accelerate), FSDP2, gradient averaging, full state dicts
* :mod:`.checkpointing` atomic save, load, prune, resume, export of the released layout
* :mod:`.logger`    metrics.jsonl, wandb, sample videos
* :mod:`.memory`    analytic memory model of the 1.3B stages (used by scripts/bench_train.py)
"""
