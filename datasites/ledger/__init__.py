"""Site bookkeeping: the privacy budget ledger, the audit log, and the SQLite store under both."""
