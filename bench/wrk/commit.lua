function request()
  return wrk.format("POST", "/v1/reservations/" .. next_id() .. "/commit", headers, "")
end
