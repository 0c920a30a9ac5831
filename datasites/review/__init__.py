"""Review of submitted jobs: the queue, the policy report, access policies, approvals."""
