"""The HTTP front end of the Hogwild! inference server."""
