"""What every API handler gets: settings, the model store and the scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.config import Settings
    from supervisor.scheduler import Scheduler
    from supervisor.store import ModelStore


@dataclass
class AppContext:
    settings: Settings
    store: ModelStore
    scheduler: Scheduler
    started_at: float = field(default_factory=time.time)
