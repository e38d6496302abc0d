"""Planning a run before it starts: calibrate on this machine, predict wall-clock on a given network
(``prsgd predict``)."""
