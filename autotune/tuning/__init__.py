"""Tuning: the plan as config, the back-off ladder, and the dry run that measures it."""
