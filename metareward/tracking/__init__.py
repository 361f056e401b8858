"""MLflow: campaign and iteration runs, metrics, figures, datasets, model lineage."""
