"""The job contract both wings read, and nothing else: plan, model spec and builder, weights on
the wire, privacy plan and accounting, metadata, the error root, the CLIs' console.

Import the submodules directly (``policies.plan``, ``policies.privacy``...): this package does not
import them eagerly, because accounting pulls in Opacus and torch, which a CLI that only asks for
a status should not pay for. The site's own bookkeeping (ledger, audit, review) is in
``datasites``; syft is imported by neither this package nor its tests' subjects.
"""
