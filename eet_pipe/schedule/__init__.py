"""Pipeline schedules as data: actions, built-in schedules, and a cost simulator."""

from eet_pipe.schedule.actions import (
    Action,
    Key,
    Op,
    Schedule,
    parse_action,
    parse_actions,
    producer_of,
)
from eet_pipe.schedule.schedules import (
    SCHEDULES,
    build,
    check_args,
    clock_table,
    decode,
    gpipe,
    interleaved,
    sequential,
)
from eet_pipe.schedule.simulate import (
    ComputeCost,
    SimResult,
    TransferCost,
    decode_utilisation,
    gpipe_bubble,
    interleaved_bubble,
    simulate,
)

__all__ = [
    "SCHEDULES",
    "Action",
    "ComputeCost",
    "Key",
    "Op",
    "Schedule",
    "SimResult",
    "TransferCost",
    "build",
    "check_args",
    "clock_table",
    "decode",
    "decode_utilisation",
    "gpipe",
    "gpipe_bubble",
    "interleaved",
    "interleaved_bubble",
    "parse_action",
    "parse_actions",
    "producer_of",
    "sequential",
    "simulate",
]
