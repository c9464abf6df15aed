"""FLOPs and MFU accounting, the hardware table, and metric loggers."""
