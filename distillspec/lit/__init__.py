"""Lightning modules and loops (training, SD evaluation), data loading and loggers."""
