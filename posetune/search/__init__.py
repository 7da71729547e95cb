"""The search: space files, the Optuna searcher and the trial scheduler, one trial (a Ray Train
`TorchTrainer` running `fit`), the trial events and results records, and the run itself."""
