"""Scaling-law studies: plan, run, fit."""
