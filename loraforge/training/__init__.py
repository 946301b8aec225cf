"""The parts of the finetune loop that are not the loop: optimizers, LR schedules, losses and
noise, EMA, caption augmentation and exact resume. `stages/finetune.py` reads top to bottom and
calls these; each module is small enough to read on its own."""
