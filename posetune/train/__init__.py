"""Training: the model and its losses and metrics, checkpoints, and `fit` (one process or one
DDP rank), plus evaluation and prediction from a checkpoint. Nothing here imports Ray or MLflow."""
