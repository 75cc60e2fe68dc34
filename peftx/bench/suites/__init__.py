"""The four suites: inference, training, export, profile."""
