"""The simulation: SUMO networks from OpenStreetMap (maps, osm, sumo_tools), the routing graph
(roadgraph), demand (demand), the multi-agent navigation environment (env) and the reference
policies that act in it (policies). Nothing here knows about learning, experts or MPI."""
