"""Tracking: the runs registry (`runs`), metrics reports (`metrics`) and PNG plots (`plots`)."""
