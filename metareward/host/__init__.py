"""The machine a job runs on: free local ports for the servers and process groups a job starts."""
