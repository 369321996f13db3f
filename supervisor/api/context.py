"""What every API handler gets: settings, the model store and the scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.supervisor.config import Settings
    from corral.supervisor.scheduler import Scheduler
    from corral.supervisor.store import ModelStore


@dataclass
class AppContext:
    settings: Settings
    store: ModelStore
    scheduler: Scheduler
    started_at: float = field(default_factory=time.time)
    stopping: bool = False  # the server has begun to shut down: endless streams (/ui/events) end
