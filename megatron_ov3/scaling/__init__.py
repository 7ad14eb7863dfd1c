"""Scaling studies: an analytic planner (memory and step time per layout) and measured runs."""
