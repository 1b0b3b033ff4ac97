"""Training, evaluation and the run directory they share."""
