"""carcli beyond one process: batch jobs on Ray (:mod:`.ray_batch`).

Training on many processes (DDP under torchrun) lives in :mod:`carcli.train.ddp`.

Ray is the optional extra ``carcli[ray]``; DDP needs only torch and ``torchrun``.
"""
