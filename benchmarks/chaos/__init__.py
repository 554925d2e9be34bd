"""`grym-stream chaos`: the hardening suite. It attacks a server it starts (or one at `--url`) the
way an attacker and a careless client would, measures that the server holds, prints a table and
writes chaos.json and chaos.md.

Each scenario is a module with one `run(plan) -> Outcome`: what it did, its figures, and the
checks the issue's targets set (each with what was measured and the target). A scenario starts
the server processes it needs (`Target`, target.py) with the settings it is about: a few
sessions' limit to test admission, a generator to kill its worker, a token to test access.

    grym-stream chaos                 # the full run (tens of minutes on 2 cores)
    grym-stream chaos --quick         # every scenario, small: proves the suite works (CI)
    grym-stream chaos --only floods   # some scenarios
    grym-stream chaos --url ws://host:port/v1/stream   # the scenarios that need no process
"""
