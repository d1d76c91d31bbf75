"""fewstep: distil many-step flow image models into 1-4-step students and serve them."""

__version__ = "0.1.0"
