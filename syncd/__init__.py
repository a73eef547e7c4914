"""syncd: keeps Criteo contact-list audience segments in step with CRM membership in PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"
