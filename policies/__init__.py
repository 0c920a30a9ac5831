"""Rules both sides read: plans, access policies, code checks, accounting, the budget ledger.

Import the submodules directly (``policies.plan``, ``policies.ledger``...): this package does not
import them eagerly, because accounting pulls in Opacus and torch, which a CLI that only asks for
a status should not pay for.
"""
