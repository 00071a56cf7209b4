"""carcli beyond one process: batch jobs on Ray (:mod:`.ray_batch`), DDP training (:mod:`.ddp`).

Both engines are optional: Ray is the extra ``carcli[ray]``; DDP needs only torch and ``torchrun``.
"""
