"""The application: twistd options and service, workers, reload, config check, metrics."""
