"""The model runtime: artifacts loaded onto a device, requests merged into passes, reloads."""
