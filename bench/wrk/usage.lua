function request()
  return wrk.format("GET", "/v1/coaches/" .. coach() .. "/usage", headers)
end
