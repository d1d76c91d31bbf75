"""Teacher training, distillation recipes, evaluation and the colored-digits data."""
