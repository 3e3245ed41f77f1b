"""The operator console: queue, workers, accounts, storage and base models for whoever runs the studio."""
