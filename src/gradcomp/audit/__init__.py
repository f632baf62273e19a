"""Empirical leakage audit of compression pipelines: gradient-inversion attacks on what a
spec really puts on the wire, scored against the victims (`gradcomp audit`).

A spec that resists these attacks bounds leakage from below against them; it is not a
proof of privacy (that is what the dp stage's epsilon is for).
"""

from gradcomp.audit.config import AuditConfig, SpecAudit
from gradcomp.audit.run import audit_specs

__all__ = ["AuditConfig", "SpecAudit", "audit_specs"]
