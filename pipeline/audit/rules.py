"""The cleaning rule's two thresholds, in a module of their own so `audit --help` can state them
without importing the audit (scikit-learn); both were chosen on flip seeds 0-11 (bench/audit.py), and
DROP_BELOW checked against 0.1, 0.3 and 0.5 on fresh seeds 300-309 scored out of fold (`--drop-grid`):
the svm's best, level with 0.3 for the logistic head."""

RELABEL_CONFIDENCE = 0.7  # --relabel applies a suggestion from this out-of-fold probability
DROP_BELOW = 0.2  # cleaned.csv drops a label issue whose given label has an out-of-fold probability under this
