package dataplane

// MonitorQueue is how many events a monitor stream holds for its client.
const MonitorQueue = monQueue
