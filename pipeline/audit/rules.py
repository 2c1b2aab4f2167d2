"""The cleaning rule's two thresholds, in a module of their own so `audit --help` can state them
without importing the audit (scikit-learn); both were chosen on flip seeds 0-11 (bench/audit.py)."""

RELABEL_CONFIDENCE = 0.7  # --relabel applies a suggestion from this out-of-fold probability
DROP_BELOW = 0.2  # cleaned.csv drops a label issue whose given label has an out-of-fold probability under this
