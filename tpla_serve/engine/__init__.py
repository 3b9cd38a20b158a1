"""Scheduler, model runner and the offline Engine."""
