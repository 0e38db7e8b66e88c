"""torchrun (torch's elastic agent), tethered to the round trip's launcher: it ends when the launcher
is gone, even killed with SIGKILL, instead of running the trip on without anyone waiting for it."""

from __future__ import annotations

from .tether import watch_launcher


def main() -> None:
    watch_launcher()
    from torch.distributed.run import main as torchrun

    torchrun()  # reads its arguments from sys.argv, as torchrun does


if __name__ == "__main__":
    main()
