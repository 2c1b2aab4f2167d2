"""Data audit from cached features: label issues, duplicates and leakage, outliers, model errors, and the report."""
