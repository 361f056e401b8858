"""The machine a job runs on: the GPUs it was given, free local ports for the servers it starts."""
