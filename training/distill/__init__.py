"""Step distillation (thesis §1.4.1): recipes that wrap a frozen teacher and a trainable student.

Each method lives in its own module and is registered in ``methods.py``.
"""
