"""The ``report:`` section: which published number each method's row is compared with, and the
report's notes (``selfsup/report/results.py``). Parsed when first read (``selfsup.core.config.SECTIONS``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from selfsup.core.config import ConfigError


@dataclass
class ReportCfg:
    # method -> the id of the published number its row is compared with (selfsup/report/paper_results.yaml,
    # each with its source); a preset sets these. A method left out gets paper_note instead
    paper: dict[str, str] = field(default_factory=dict)
    paper_note: str = "digits: a pipeline check at 8x8 px; no paper reports it"
    # lines added to the report's notes: ``python -m selfsup.presets apply`` writes the preset's title
    # and its differences from the paper (data, schedule, protocol) here
    notes: list[str] = field(default_factory=list)

    def check(self, p: str) -> None:
        for m, pid in self.paper.items():
            if not pid:
                raise ConfigError(f"{p}.paper.{m}: empty id; leave the method out for no paper number")
