"""The read-only status page the worker serves at ``/status`` on its probe server.

:mod:`~worker.statuspage.history` keeps the backlog samples the worker takes itself
(every backlog refresh); :mod:`~worker.statuspage.page` gathers what the page shows
from the worker and the database; :mod:`~worker.statuspage.render` turns that into
one self-contained HTML document (inline CSS, server-drawn SVG charts, no script).
"""

from __future__ import annotations

from worker.statuspage.history import BacklogHistory, Sample
from worker.statuspage.page import PageData, SinkView, StatusPage
from worker.statuspage.privacy import Privacy
from worker.statuspage.render import render

__all__ = ["BacklogHistory", "PageData", "Privacy", "Sample", "SinkView", "StatusPage", "render"]
