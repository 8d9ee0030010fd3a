"""Files: datasets and ids files, checkpoints and the files they record, atomic writes,
YAML config. No pickle is ever loaded."""
